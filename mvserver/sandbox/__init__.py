"""Built-in provider simulator ("sandbox mode")."""
