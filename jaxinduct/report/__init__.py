"""What people read: the `show` table and the HTML report."""
