"""Stage kinds. Each module has one public entry point and no CLI code."""
