"""One LightningDataModule per benchmark, reading the benchmark's official layout."""
