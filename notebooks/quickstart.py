# %% [markdown]
# # vgjax quickstart: a model by name, two folders, predictions, photos without coordinates
#
# Runs on Colab (Runtime > GPU for speed) or any machine with Python 3.11. The source of this
# notebook is `notebooks/quickstart.py` (jupytext percent format); `quickstart.ipynb` is made
# from it by `python notebooks/make_ipynb.py`, and the test suite runs it on a tiny dataset.

# %%
# On Colab or a fresh machine, install vgjax first (a wheel built from the repository with
# `pip wheel --no-deps .`; add [gpu] for NVIDIA GPUs):
#   !pip install vgjax-0.1.0-py3-none-any.whl
import os
import shutil
from pathlib import Path

import vgjax
from vgjax import models

MODEL = os.environ.get("VGJAX_QUICKSTART_MODEL", "cosplace_resnet18_512")  # a zoo name or a file
DATA = Path(os.environ.get("VGJAX_QUICKSTART_DATA", "quickstart_data"))
OUT = Path("quickstart_out")

# %% [markdown]
# Your own data: two folders of images whose names carry their UTM position in the VG format
# (`@east@north@zone@letter@lat@lon@...@.jpg`). Without any, a small synthetic aerial world is
# rendered here.

# %%
if not DATA.exists():
    from vgjax.data import synthetic

    synthetic.build_aerial_dataset(DATA, num_queries=12, size_m=100.0, image_size=(96, 128), progress=False)
database, queries = DATA / "images" / "test" / "database", DATA / "images" / "test" / "queries"
print(models.available()[0].name, "...", len(models.available()), "networks by name")

# %% [markdown]
# ## A network by name (downloaded once, hash-checked, then cached)

# %%
network, variables, image_size, embed_fn = loaded = models.load(MODEL)
print(f"{MODEL}: images at {image_size}")

# %% [markdown]
# ## Evaluate it on the two folders: recalls, pictures, predictions.csv

# %%
summary = vgjax.evaluate_folders(loaded, database, queries, output=OUT / "labelled", recall_values=(1, 5),
                                 num_preds_to_save=3, queries_to_save=2)
print(summary["results"]["hard_resize"]["recalls"])

# %%
pictures = sorted((OUT / "labelled" / "predictions" / "hard_resize" / "preds").glob("*.jpg"))
try:
    from IPython.display import Image, display

    for picture in pictures:
        display(Image(filename=str(picture), width=800))
except ImportError:  # outside a notebook
    print("pictures:", *pictures, sep="\n  ")

# %% [markdown]
# ## Photos without coordinates: where were they taken?

# %%
photos = OUT / "my_photos"
photos.mkdir(parents=True, exist_ok=True)
for i, query in enumerate(sorted(queries.glob("*.jpg"))[:3]):
    shutil.copy(query, photos / f"IMG_{i:04d}.jpg")  # names without any position
places = vgjax.geolocalize(loaded, database, photos, k=1, output=OUT / "photos")
for place in places:
    print(f"{Path(place['query']).name}: east {place['east']}, north {place['north']} (UTM), "
          f"lat/lon {place['lat'] or '?'} {place['lon'] or '?'}")
