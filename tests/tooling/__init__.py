"""Tools the test suite and the benchmarks share; none of them is part of the installed library."""
