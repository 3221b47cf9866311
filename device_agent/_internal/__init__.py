"""Private building blocks of the bundle reader. Not a public API: names here may change."""
