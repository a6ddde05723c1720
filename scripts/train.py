"""Train the scenes LLaVA (see `st3.data.train` for the options): python scripts/train.py --help"""

from st3.data.train import main

if __name__ == "__main__":
    main()
