"""Train the scenes LLaVA (see `st3_scenes.train` for the options): python scenes/scripts/train.py --help"""

from st3_scenes.train import main

if __name__ == "__main__":
    main()
