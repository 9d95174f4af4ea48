"""Training samplers of pretext tasks: each builds one training sample from one video (see datamodules.clips.ClipSampler)."""
