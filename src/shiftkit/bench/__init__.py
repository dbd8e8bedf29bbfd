"""shiftkit.bench: benchmark suites and the report; it composes, owns no components."""
