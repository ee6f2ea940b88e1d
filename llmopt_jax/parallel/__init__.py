"""Device meshes, logical-axis sharding rules, and sharded initialisation."""
