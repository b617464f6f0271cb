# -*- test-case-name: tests.test_run -*-
"""
C{python -m miniproxy}: see L{miniproxy.run}.
"""

import sys

from miniproxy.run import main

if __name__ == "__main__":
    sys.exit(main())
