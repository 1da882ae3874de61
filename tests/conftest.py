pytest_plugins = ["harness.etcd_fixtures", "harness.mesh_fixtures", "harness.cluster_fixtures"]
