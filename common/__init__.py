"""Small pieces every subcommand shares: user-facing errors, the console, locating source models."""
