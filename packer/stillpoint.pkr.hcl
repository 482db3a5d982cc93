# The Stillpoint appliance image: a Debian 12 VM built in vCenter from the netinst ISO with
# a preseed, provisioned by scripts/provision.sh (the same script CI runs in a fresh Debian
# root), then turned into a template. See docs/deploy.md.
#
#   packer validate -var-file=site.pkrvars.hcl packer/
#   packer build    -var-file=site.pkrvars.hcl packer/
#
# Secrets (vcenter_password, build_password) come from the environment
# (PKR_VAR_vcenter_password=...) or a 0600 var file, never from the command line.

variable "vcenter_server" {
  type        = string
  description = "vCenter host name; its certificate must be trusted by the build machine."
}

variable "vcenter_username" {
  type = string
}

variable "vcenter_password" {
  type      = string
  sensitive = true
}

variable "datacenter" {
  type = string
}

variable "cluster" {
  type = string
}

variable "datastore" {
  type = string
}

variable "network" {
  type        = string
  description = "Port group with DHCP during the build (the appliance may use static IP later)."
}

variable "folder" {
  type    = string
  default = ""
}

variable "iso_path" {
  type        = string
  description = "Debian 12 netinst ISO on a datastore, e.g. \"[iso] debian-12.11.0-amd64-netinst.iso\"."
}

variable "vm_name" {
  type    = string
  default = "stillpoint-appliance"
}

variable "system_disk_mib" {
  type    = number
  default = 16384
}

variable "repository_disk_mib" {
  type        = number
  default     = 102400
  description = "The repository disk (/dev/sdb), formatted and mounted by provision.sh."
}

variable "build_password" {
  type        = string
  sensitive   = true
  description = "Temporary password of the build user; provision.sh locks it at the end."
}

variable "stillpoint_source" {
  type        = string
  description = "Stillpoint source archive: git archive --format=tar.gz -o stillpoint.tar.gz HEAD."
}

locals {
  build_user = "stillpoint-build"
}

source "vsphere-iso" "stillpoint" {
  vcenter_server      = var.vcenter_server
  username            = var.vcenter_username
  password            = var.vcenter_password
  insecure_connection = false
  datacenter          = var.datacenter
  cluster             = var.cluster
  datastore           = var.datastore
  folder              = var.folder

  vm_name              = var.vm_name
  guest_os_type        = "debian11_64Guest"
  CPUs                 = 2
  RAM                  = 4096
  RAM_reserve_all      = false
  disk_controller_type = ["pvscsi"]

  storage {
    disk_size             = var.system_disk_mib
    disk_thin_provisioned = true
  }
  storage {
    disk_size             = var.repository_disk_mib
    disk_thin_provisioned = true
  }

  network_adapters {
    network      = var.network
    network_card = "vmxnet3"
  }

  iso_paths      = [var.iso_path]
  http_directory = "${path.root}/http"
  boot_wait      = "5s"
  boot_command = [
    "<esc><wait>",
    "auto preseed/url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/preseed.cfg ",
    "debian-installer/locale=en_US.UTF-8 keyboard-configuration/xkb-keymap=us ",
    "netcfg/get_hostname=stillpoint netcfg/get_domain=localdomain ",
    "passwd/username=${local.build_user} passwd/user-fullname=build ",
    "passwd/user-password=${var.build_password} ",
    "passwd/user-password-again=${var.build_password} ",
    "<enter>"
  ]

  ssh_username = local.build_user
  ssh_password = var.build_password
  ssh_timeout  = "40m"
  # The build user's password is locked by provision.sh; its sudo rule goes last.
  shutdown_command = "sudo sh -c 'rm -f /etc/sudoers.d/90-build; /sbin/shutdown -h now'"

  convert_to_template = true
  notes               = "Stillpoint backup appliance (Debian 12). First boot: guestinfo.stillpoint.* or 'sudo stillpoint-setup'."
}

build {
  sources = ["source.vsphere-iso.stillpoint"]

  provisioner "file" {
    source      = var.stillpoint_source
    destination = "/tmp/stillpoint-source.tar.gz"
  }

  provisioner "file" {
    source      = "${path.root}/files"
    destination = "/tmp/stillpoint-files"
  }

  provisioner "shell" {
    execute_command = "sudo -E bash '{{ .Path }}'"
    environment_vars = [
      "STILLPOINT_SRC=/tmp/stillpoint-source.tar.gz",
      "STILLPOINT_FILES=/tmp/stillpoint-files",
      "REPO_DISK=/dev/sdb",
      "BUILD_USER=${local.build_user}",
    ]
    script = "${path.root}/scripts/provision.sh"
  }
}
