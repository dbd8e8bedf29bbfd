"""shiftkit.compression (see DESIGN.md section 2)."""
