"""sdturbo-mini: a miniature SDXL-Turbo trained from scratch on procedural shapes (`sdturbo train mini`)."""
