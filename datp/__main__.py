"""`python -m datp ...` works like `datp ...` (needed for `torchrun -m datp`)."""

from datp.cli import main

if __name__ == "__main__":
    main()
