"""HTTP surface: routes translate HTTP to DataPlane calls and back, nothing more."""
