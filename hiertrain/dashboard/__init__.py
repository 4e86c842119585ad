"""``hiertrain dashboard``: a job, its plan and every device, live in a browser (read-only, as the observer)."""
