"""Graph passes of the quaff backend, one module each: find, observe, rewrite."""
