"""Layer-by-layer compression: statistics, pure solvers, the engine and export."""
