"""The emulated lab: network namespaces and tc, CPU quotas and calibration, arm64, jobs on one machine."""
