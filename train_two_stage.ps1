# Two-stage CompressedAD training: collect (if needed) -> pretrain encoder -> train -> evaluate.
# A thin wrapper over two_stage.py (all logic and its tests live there); same options as train_two_stage.sh.
#   .\train_two_stage.ps1 experiment=quick
#   .\train_two_stage.ps1 -PretrainOnly
#   .\train_two_stage.ps1 -TrainOnly -PretrainedPath "./runs/pretrain-encoder-darkroom-seed0/encoder-pretrained-final.pt"
#   .\train_two_stage.ps1 -FreezeEncoder -Accelerate -NumProcesses 4 experiment=full
param(
    [switch]$PretrainOnly,
    [switch]$TrainOnly,
    [switch]$FreezeEncoder,
    [string]$PretrainedPath = "",
    [switch]$Accelerate,
    [string]$AccelerateConfig = "",
    [int]$NumProcesses = 0,
    [switch]$NoEval,
    [switch]$Force,
    [switch]$DryRun,
    [Parameter(ValueFromRemainingArguments = $true)][string[]]$Overrides
)
$ErrorActionPreference = "Stop"
$here = Split-Path -Parent $MyInvocation.MyCommand.Path
$py = $env:PYTHON
if (-not $py) {
    $venvWin = Join-Path $here ".venv/Scripts/python.exe"
    $venvNix = Join-Path $here ".venv/bin/python"
    if (Test-Path $venvWin) { $py = $venvWin } elseif (Test-Path $venvNix) { $py = $venvNix } else { $py = "python" }
}
$argsList = @((Join-Path $here "two_stage.py"))
if ($PretrainOnly) { $argsList += "--pretrain-only" }
if ($TrainOnly) { $argsList += "--train-only" }
if ($FreezeEncoder) { $argsList += "--freeze-encoder" }
if ($PretrainedPath) { $argsList += @("--pretrained-path", $PretrainedPath) }
if ($Accelerate) { $argsList += "--accelerate" }
if ($AccelerateConfig) { $argsList += @("--accelerate-config", $AccelerateConfig) }
if ($NumProcesses -gt 0) { $argsList += @("--num-processes", "$NumProcesses") }
if ($NoEval) { $argsList += "--no-eval" }
if ($Force) { $argsList += "--force" }
if ($DryRun) { $argsList += "--dry-run" }
if ($Overrides) { $argsList += $Overrides }
& $py @argsList
exit $LASTEXITCODE
