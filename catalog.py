"""What the report shares with the rest and reads without torch: the datasets (CoOp's 11
benchmarks and ImageNet's 4 test-only variants: where each lives under the data root, its split
file, CoOp's prompt template, its name in the papers' tables) and UserError. data.py holds the
data itself; every module takes these names from there too (data.DATASETS, data.UserError).
"""
from dataclasses import dataclass


class UserError(Exception):
    """Bad input the user can fix (a flag, a data file, a path). The command-line tools print
    its message as one line without a traceback and exit with status 2; any other exception
    is a bug and keeps its traceback."""



@dataclass(frozen=True)
class DatasetInfo:
    folder: str         # under the data root
    image_dir: str      # under the folder; "" = the folder itself
    layout: str         # split_json | fgvc_aircraft | imagenet | imagenetv2 | wnid_folders
    split_file: str = ""  # split_json only: CoOp's split_zhou_*.json in the folder
    template: str = "a photo of a {}."  # CoOp's hand-crafted zero-shot prompt
    paper_name: str = ""  # the name in the papers' base-to-new tables (the 11 datasets only)

    @property
    def test_only(self):
        return self.layout in ("imagenetv2", "wnid_folders")


# In the papers' table order: the 11 base-to-new datasets, then the 4 ImageNet variants (test only).
DATASETS = {
    "imagenet": DatasetInfo("imagenet", "images", "imagenet", paper_name="ImageNet"),
    "caltech101": DatasetInfo("caltech-101", "101_ObjectCategories", "split_json",
                              "split_zhou_Caltech101.json", paper_name="Caltech101"),
    "oxford_pets": DatasetInfo("oxford_pets", "images", "split_json", "split_zhou_OxfordPets.json",
                               "a photo of a {}, a type of pet.", "OxfordPets"),
    "stanford_cars": DatasetInfo("stanford_cars", "", "split_json", "split_zhou_StanfordCars.json",
                                 paper_name="StanfordCars"),
    "oxford_flowers": DatasetInfo("oxford_flowers", "jpg", "split_json",
                                  "split_zhou_OxfordFlowers.json",
                                  "a photo of a {}, a type of flower.", "Flowers102"),
    "food101": DatasetInfo("food-101", "images", "split_json", "split_zhou_Food101.json",
                           "a photo of {}, a type of food.", "Food101"),
    "fgvc_aircraft": DatasetInfo("fgvc_aircraft", "images", "fgvc_aircraft",
                                 template="a photo of a {}, a type of aircraft.",
                                 paper_name="FGVCAircraft"),
    "sun397": DatasetInfo("sun397", "SUN397", "split_json", "split_zhou_SUN397.json",
                          paper_name="SUN397"),
    "dtd": DatasetInfo("dtd", "images", "split_json", "split_zhou_DescribableTextures.json",
                       "{} texture.", "DTD"),
    "eurosat": DatasetInfo("eurosat", "2750", "split_json", "split_zhou_EuroSAT.json",
                           "a centered satellite photo of {}.", "EuroSAT"),
    "ucf101": DatasetInfo("ucf101", "UCF-101-midframes", "split_json", "split_zhou_UCF101.json",
                          "a photo of a person doing {}.", "UCF101"),
    "imagenetv2": DatasetInfo("imagenetv2", "imagenetv2-matched-frequency-format-val",
                              "imagenetv2"),
    "imagenet_sketch": DatasetInfo("imagenet-sketch", "images", "wnid_folders"),
    "imagenet_a": DatasetInfo("imagenet-adversarial", "imagenet-a", "wnid_folders"),
    "imagenet_r": DatasetInfo("imagenet-rendition", "imagenet-r", "wnid_folders"),
}
# the 11 datasets of the papers' tables
PAPER_DATASETS = [name for name, info in DATASETS.items() if info.paper_name]
# the cross-dataset targets of a model trained on ImageNet: its 4 variants, then the other 10
XD_TARGETS = [name for name, info in DATASETS.items() if info.test_only] + PAPER_DATASETS[1:]
