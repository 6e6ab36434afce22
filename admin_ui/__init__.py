"""Server-rendered admin and self-service pages."""
