"""The prototype index: neighbourhoods of training positions, stored with the bundle."""
