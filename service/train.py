"""``python -m service.train``: train the FNN on real MNIST and write a new version (``service.model.training``)."""

import sys

from service.model.training import main

if __name__ == "__main__":
    sys.exit(main())
