"""shiftkit.adapt (see DESIGN.md section 2)."""
