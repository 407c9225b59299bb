"""Metrics as the reference tools define them: pure functions (`metrics`), scoring files
(`files`), paired bootstrap (`significance`), the evaluate library's catalogue (`catalogue`)."""
