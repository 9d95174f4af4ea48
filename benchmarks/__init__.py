"""Everything about judging: official metrics, submission writers, leaderboards, performance benchmarks."""
