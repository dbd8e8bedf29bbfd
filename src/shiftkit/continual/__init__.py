"""shiftkit.continual (see DESIGN.md section 2)."""
