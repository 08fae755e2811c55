"""python convert.py --hf-path SRC --mlx-path OUT [-q]: see mlx_mla/convert.py."""

from mlx_mla.convert import main

if __name__ == "__main__":
    main()
