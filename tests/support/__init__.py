"""Helpers shared by the tests: real servers on loopback, never mocks of our own code."""
