"""Bytes on the wire, topic names, MQTT delivery: how the tiers talk."""
