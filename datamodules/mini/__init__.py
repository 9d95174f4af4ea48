"""Writers of small datasets in each benchmark's official layout, for the demo and tests."""
