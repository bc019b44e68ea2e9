"""Interfaces layer: PLC ports (OPC UA, Modbus), operator HMI and storage implementations."""
