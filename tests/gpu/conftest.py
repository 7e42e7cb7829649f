import os
import sys

# the multi-process helpers live one folder up (tests/distributed.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
