"""shiftkit.merging (see DESIGN.md section 2)."""
