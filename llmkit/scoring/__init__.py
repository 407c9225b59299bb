"""Metrics as the reference tools define them: pure functions (`metrics`), scoring files
(`files`), paired significance tests (`significance`), the evaluate library's catalogue
(`catalogue`)."""
