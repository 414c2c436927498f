"""The lowest layer: helpers every component may use. It imports no other Relay package, so actors/,
learner/, buffer/, transport/ and launch/ can all depend on it without bending the layer rule."""
