"""Tests import the project's flat scripts from the repo root, whatever the working directory."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
