"""shiftkit.recipes (see DESIGN.md section 2)."""
