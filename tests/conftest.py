import os
import sys

# the tests import their float64 oracle and helpers from tests/reference.py
sys.path.insert(0, os.path.dirname(__file__))
