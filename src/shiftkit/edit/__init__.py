"""shiftkit.edit (see DESIGN.md section 2)."""
