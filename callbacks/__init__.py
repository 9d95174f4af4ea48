"""Cross-cutting training behaviour as Lightning callbacks: results, pictures, throughput."""
