"""Plain-torch distributed pieces: collectives with autograd (:mod:`.comm`) and the
model-parallel softmax over sharded class centres, with its checkpoint helpers
(:mod:`.model_parallel_softmax`)."""
