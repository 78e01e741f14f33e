"""Simulated methane detectors and smart meters for field technicians and tests.

Real Modbus TCP servers (pymodbus) answer from a numpy simulation of households, driven by
scenario files on a virtual clock; an MQTT-native mode publishes wire-format batches.
"""
