"""shiftkit.bench (see DESIGN.md section 2)."""
