"""diffkiln's demo model: synthetic captioned shapes (`data`, numpy + Pillow only, like the runtime) and the trained
model's images through diffusers and through diffkiln (`sampling`, needs torch); the model itself ships in
`diffkiln/assets/demo`."""
