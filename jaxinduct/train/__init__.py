"""Reference trajectories: the built-in corpora and the optax trainer that saves an Orbax trajectory."""
