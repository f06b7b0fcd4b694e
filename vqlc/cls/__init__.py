"""Image classification on token maps (issue 14): a ViT shaped as MAE fine-tunes ViT-B/16
(vqlc.cls.vit) whose input is an image or a tokenizer's token map through a stem, MAE's
pretrained encoder read without torch (vqlc.cls.convert_mae, with vqlc.cls.pos_embed's
bicubic position-embedding interpolation), and MAE's fine-tuning recipe (vqlc.cls.recipe:
layer-wise lr decay, mixup / cutmix on token maps, soft targets)."""
