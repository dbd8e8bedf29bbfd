"""shiftkit.data (see DESIGN.md section 2)."""
