"""Self-supervised video representation methods (UCF101) and their evaluation protocols."""
