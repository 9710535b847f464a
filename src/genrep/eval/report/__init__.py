"""What people read: figures, the text summary, the HTML report, sample grids."""
